"""Training with quantization: QAT (prepare -> train -> convert), QLoRA, the 8-bit AdamW,
and the loop they share."""
from .loop import TrainConfig, train
from .optim8bit import AdamW8bit
from .qat import convert, prepare_qat
from .qlora import dequantized_model, load_adapter, merge, prepare_qlora, save_adapter

__all__ = ["TrainConfig", "train", "AdamW8bit", "prepare_qat", "convert", "prepare_qlora", "save_adapter",
           "merge", "dequantized_model", "load_adapter"]
