"""The algorithm as pure tensor functions: QAE / mean advantages, the policy losses, log-probs."""
