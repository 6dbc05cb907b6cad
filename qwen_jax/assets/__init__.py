"""Files shipped with the package.

DEFAULT_MODEL: the small Qwen3 checkpoint made by the default `python -m train.pretrain` run (4.2M
parameters, a 4,096-token BPE, trained on the shipped Shakespeare corpus). It is what `infer.generate`
and the SFT/DPO demos use when no --model is given.
"""

import os

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3-4m-shakespeare")
