"""vLLM's `vllm.general_plugins` entry point (pyproject.toml): registers our gloo weight-transfer engine
(alignment/rollout/gloo.py) under the backend name `gloo`, on both the server's and the trainer's side.

vLLM loads general plugins in every one of its processes, so this module imports nothing of ours: the
engine's module (and with it the `alignment` package) is imported only where a gloo transfer is created.
"""

ENGINES = "alignment.rollout.gloo"


def register() -> None:
    """Idempotent: vLLM may load plugins more than once, and the trainer calls it before its first push."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", ENGINES, "GlooWeightTransferEngine")
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", ENGINES, "GlooTrainerWeightTransferEngine")
