"""Weight methods (how quantized values are chosen) and block transforms: one file each,
registered by name (see base.py for their shape). Adding one = its file + one import line here.

A method is a frozen dataclass: `GPTQ(damp=0.05)`; `method_of("gptq")` builds one by name.
"""
from .base import (METHODS, TRANSFORMS, Method, RecordedMethod, Transform, method_of, recorded_method,
                   register_method, register_transform, transform_of)

# one line per method / transform (importing registers it)
from .rtn import RTN  # noqa: E402
from .rtn_mse import RTNMSE  # noqa: E402
from .llm_int8 import LLMInt8  # noqa: E402
from .gptq import GPTQ  # noqa: E402
from .smoothquant import SmoothQuant  # noqa: E402
