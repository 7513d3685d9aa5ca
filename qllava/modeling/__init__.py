# `QllavaForCausalLM.save_pretrained` / `.from_pretrained` call what `checkpoint` registers in `model.CHECKPOINT_IO`;
# importing it with the package means a model always has them, whatever the caller imported first
from . import checkpoint as _checkpoint
