"""Running a compiled spec: CompiledModel, its module stacks, the per-batch context, generation."""

from hrmspec.runtime.execution.compiled import CompiledModel, KVCache, ModelOutput
from hrmspec.runtime.execution.context import Context
from hrmspec.runtime.execution.stack import ModuleStack

__all__ = ["CompiledModel", "Context", "KVCache", "ModelOutput", "ModuleStack"]
