"""Where answers are sampled: a generation backend turns prompts into answers (token ids), each answer a function
of its own seed, so that it does not depend on the batch or the process it was generated in.

Two backends behind one interface (`prompt_ids`, `sample`, `answers`, `text`, `set_model`, `sync`):
- :class:`Sampler`: transformers `generate` on the model being trained, in batches, under the run's autocast;
- :class:`VLLMSampler`: vLLM (vllm_engine.py), in this process or in a server, given the trained weights before it
  answers with them (`sync`, once per optimizer step), and returning its own log-prob of every sampled token.
"""

from __future__ import annotations

from ..data.prompts import PromptRow
from ..data.tokens import encode_prompt
from .inference import sample_answers
from .loop import Engine


def sample_in_step(engine: Engine, model, prompt_ids: list[list[int]], seeds: list[int], batch_size: int,
                   max_new_tokens: int, temperature: float, pad_token_id: int, eos_token_id: int | None,
                   stand_in_token: int) -> list[list[int]]:
    """Answers (token ids) to `prompt_ids` in batches, under the run's autocast. With sharded weights every process
    must call this as often as the others, and each runs as many batches as the busiest one, with a one-token
    stand-in prompt where it has none of its own (its answer is dropped). `eos_token_id` None: the model's own."""
    synced = engine.sharded
    windows = [slice(start, start + batch_size) for start in range(0, len(prompt_ids), batch_size)]
    out: list[list[int]] = []
    with engine.autocast():
        for window, own in engine.in_lockstep(windows):
            prompts, prompt_seeds = (prompt_ids[window], seeds[window]) if own else ([[stand_in_token]], [0])
            answers = sample_answers(model, prompts, prompt_seeds, max_new_tokens, temperature, pad_token_id,
                                     eos_token_id, synced)
            out += answers if own else []
    return out


class Sampler:
    """The policy answering prompts: token ids in, answers out, in batches, in eval mode, under the run's autocast."""

    def __init__(self, model, tokenizer, config, engine: Engine):
        self.model, self.tokenizer, self.config, self.engine = model, tokenizer, config, engine
        self.eos = tokenizer.eos_token_id

    def set_model(self, model) -> None:
        self.model = model

    def prompt_ids(self, row: PromptRow, conversation: list | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, conversation if conversation is not None else row.prompt, row.source)

    # the sampler's own log-probs of its answers: None, they are the trainer's
    gives_logps = False

    def sync(self, version) -> None:
        """The weights just trained answer from now on: the model itself does, nothing to do."""

    def sample(self, prompt_ids: list[list[int]], seeds: list[int],
               temperature: float) -> tuple[list[list[int]], list[list[float]] | None]:
        """The answers and, where the backend has them, its log-prob of each sampled token."""
        return self.answers(prompt_ids, seeds, temperature), None

    def answers(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float) -> list[list[int]]:
        """Sharded weights: every process calls this as often as the others (see :func:`sample_in_step`)."""
        was_training = self.model.training
        self.model.eval()
        out = sample_in_step(self.engine, self.model, prompt_ids, seeds, self.config.generation_batch_size,
                             self.config.max_new_tokens, temperature, self.tokenizer.pad_token_id, self.eos, self.eos)
        self.model.train(was_training)
        return out

    def text(self, answer_ids: list[int]) -> str:
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()

    def after_sampling(self) -> None:
        """Called when a step's answers are all written."""

    def close(self) -> None:
        """Training is over: free what only sampling needed."""


class VLLMSampler(Sampler):
    """Answers written by vLLM (:mod:`.vllm_engine`): a :class:`LocalEngine` in this process (--vllm-mode colocate)
    or a server's (server). `sync(version)` pushes the policy's weights whenever `version` (the optimizer step)
    changed since the last push; with sharded weights they are gathered once, onto the main process, which pushes
    them to the server while the others wait."""

    gives_logps = True

    def __init__(self, model, tokenizer, config, engine: Engine, vllm_engine):
        super().__init__(model, tokenizer, config, engine)
        self.vllm = vllm_engine
        self.synced = None      # the version vLLM holds; None: the starting weights, as loaded

    def sync(self, version) -> None:
        if version == self.synced:
            return
        from .vllm_engine import checkpoint_weights

        local = self.config.vllm_mode == "colocate"  # one training process (make_sampler)
        whole = self.engine.whole_weights(self.model, everywhere=local)
        if whole is not None:
            self.vllm.load_weights(checkpoint_weights(self.model, whole))
        del whole
        if not local:
            self.engine.wait()  # the server answers every process with the new weights
        self.synced = version

    def sample(self, prompt_ids, seeds, temperature):
        if not prompt_ids:
            return [], []
        return self.vllm.generate(prompt_ids, seeds, temperature, self.config.max_new_tokens, self.eos)

    def answers(self, prompt_ids, seeds, temperature):
        return self.sample(prompt_ids, seeds, temperature)[0]

    def after_sampling(self) -> None:
        """The trainer's forward and backward passes come next: with --vllm-enable-sleep-mode vLLM frees its KV
        cache until it answers again."""
        if self.config.vllm_enable_sleep_mode:
            self.vllm.sleep()

    def close(self) -> None:
        self.vllm.close()


def make_sampler(model, tokenizer, config, engine: Engine, model_dir, prompts: list[PromptRow]) -> Sampler:
    """The run's generation backend: vLLM with --use-vllm, else transformers."""
    if not config.use_vllm:
        return Sampler(model, tokenizer, config, engine)
    from .vllm_engine import EngineSettings, LocalEngine, RemoteEngine

    if config.vllm_mode == "server":
        return VLLMSampler(model, tokenizer, config, engine, RemoteEngine(config.vllm_server_base_url))
    if engine.world > 1:
        from ..errors import ConfigError

        raise ConfigError("--use-vllm --vllm-mode colocate runs in one training process: with several (and with "
                          "sharded weights: FSDP, ZeRO-3) use --vllm-mode server, one `thumbalign vllm-serve` that the "
                          "main process sends the weights to (gathered once per step)")
    plain = Sampler(model, tokenizer, config, engine)
    longest = max(len(plain.prompt_ids(row)) for row in prompts)
    # a retry turn adds the answer and the user's reply to the conversation
    turns = config.retry_turns * (config.max_new_tokens + len(tokenizer(config.retry_message)["input_ids"]) + 16)
    limit = getattr(model.config, "max_position_embeddings", None) or longest + turns
    settings = EngineSettings(model_dir=str(model_dir), dtype="bfloat16" if engine.bf16 else "float32",
                              seed=config.seed, max_model_len=min(limit, longest + turns),
                              # a step's answers at once at most: the KV cache is sized to them
                              max_num_seqs=min(config.generation_batch_size, config.num_generations
                                               * config.per_device_train_batch_size
                                               * config.gradient_accumulation_steps),
                              gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                              enable_sleep_mode=config.vllm_enable_sleep_mode)
    engine.say(f"vLLM writes the answers, in this process ({settings.dtype}, sequences of up to "
               f"{settings.max_model_len} tokens, {settings.max_num_seqs} at a time)")
    return VLLMSampler(model, tokenizer, config, engine, LocalEngine(settings))
