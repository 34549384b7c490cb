"""RFT — rejection-sampling fine-tuning online: likelihood of the 👍 answers only (NFT without its negative term)."""

from __future__ import annotations

from .nft import nft_token_losses
from .online_base import GroupBatch, OnlineObjective


def rft_token_losses(x: GroupBatch):
    """l_it = −o_i·log R_t: on-policy the gradient is −o_i·∇log π_θ(a_t), supervised learning on the 👍 answers;
    👎 answers contribute nothing."""
    return nft_token_losses(x, weighting="constant", negative_weight=0.0)


class RFT(OnlineObjective):
    name, normalization = "rft", "constant"
    summary = "RFT: supervised fine-tuning on the model's own 👍 answers; 👎 answers are discarded"

    def token_losses(self, x):
        return rft_token_losses(x)
