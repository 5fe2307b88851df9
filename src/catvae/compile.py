"""Optional ``torch.compile`` of a model's networks (config group ``compile``: ``none`` or ``networks``)."""

from __future__ import annotations

from torch import nn

from catvae.estimators import Estimator
from catvae.validation import check_choice


class CompileNetworks:
    """Compiles in place (``nn.Module.compile``) every network the model calls: its submodules other than
    estimators, looking inside ModuleList/ModuleDict containers. The estimators stay eager (their sampling,
    baselines' running state and, for REBAR/RELAX, second-order ``autograd.grad`` are Python-level logic),
    so every estimator works unchanged. Compiling in place keeps the state-dict keys, so checkpoints and
    ``resume`` are the same with and without it. ``mode`` is torch.compile's ("reduce-overhead" adds CUDA
    graphs on a GPU); ``dynamic`` its shape policy (None: static first, dynamic after a shape change).
    """

    MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    DYNAMIC = (None, True, False)

    def __init__(self, mode: str = "default", dynamic: bool | None = None, fullgraph: bool = False):
        check_choice("compile.mode", mode, self.MODES)
        check_choice("compile.dynamic", dynamic, self.DYNAMIC)
        check_choice("compile.fullgraph", fullgraph, (True, False))
        self.options = {"mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}

    def __call__(self, model: nn.Module) -> list[str]:
        """Compile the model's networks; returns their names. Refuses estimators that differentiate through
        the networks twice (``Estimator.double_backward``: REBAR, RELAX), which compiled code cannot do."""
        refused = sorted({m.name for m in model.modules() if isinstance(m, Estimator) and m.double_backward})
        if refused:
            raise ValueError(f"compile=networks cannot train estimator {', '.join(refused)}: it differentiates "
                             f"twice through the networks (its variance gradient), which torch.compile does not "
                             f"support; use compile=none")
        compiled = []

        def visit(prefix: str, module: nn.Module) -> None:
            for name, child in module.named_children():
                if isinstance(child, Estimator):
                    continue
                if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    visit(f"{prefix}{name}.", child)
                else:
                    child.compile(**self.options)
                    compiled.append(prefix + name)

        visit("", model)
        return compiled
