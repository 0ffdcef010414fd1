"""Set module constants of weavelm before a benchmark builds its models: to measure a knob
without editing the source. A knob is MODULE.NAME=VALUE, e.g. kernels.fp8_gemv.EARLY_STEPS=1
(weavelm.kernels.fp8_gemv.EARLY_STEPS), its value converted to the constant's type."""
import importlib
import sys


def apply(knobs) -> None:
    for knob in knobs:
        name, eq, value = knob.partition("=")
        module, dot, attr = name.rpartition(".")
        if not (eq and dot):
            sys.exit(f"knob {knob!r}: write MODULE.NAME=VALUE, e.g. kernels.fp8_gemv.EARLY_STEPS=1")
        try:
            mod = importlib.import_module("weavelm." + module)
        except ImportError:
            sys.exit(f"knob {knob}: there is no module weavelm.{module}")
        if not hasattr(mod, attr):
            sys.exit(f"knob {knob}: weavelm.{module} has no {attr}")
        old = getattr(mod, attr)
        if not isinstance(old, (bool, int, float, str)):
            sys.exit(f"knob {knob}: weavelm.{name} is a {type(old).__name__}, not a number, "
                     f"bool or string")
        setattr(mod, attr, value.lower() in ("1", "true") if isinstance(old, bool)
                else type(old)(value))
        print(f"set weavelm.{name} = {getattr(mod, attr)!r}", flush=True)
