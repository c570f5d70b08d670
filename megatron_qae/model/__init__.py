"""The Megatron-Core policy and its parallel layout: model build from the HF config, the HF
weight mapping, sharded weight I/O, the optimizer, process groups, and the CPU shim."""
