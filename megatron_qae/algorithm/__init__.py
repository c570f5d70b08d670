"""The algorithm as pure tensor functions: QAE / mean advantages, the objective and the registered
policy losses (losses/), log-probs."""
