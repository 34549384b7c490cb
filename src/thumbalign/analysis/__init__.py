"""Analysis layer: did it work? Pure metrics, judges, held-out feedback scoring, judged generations, best-of-n,
reward-model scoring, inspecting a file before training, and the HTML report."""
