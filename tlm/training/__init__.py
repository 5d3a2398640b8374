"""Training: the config, data for a run, the backends (plain/DDP, DeepSpeed ZeRO, FSDP2), the loop, evaluation,
metrics and logging, stopping on request, fault injection, and the quiet launchers."""
