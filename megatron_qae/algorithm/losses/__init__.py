"""The policy losses, one module each, registered by name (registry.py); shared pieces in surrogate.py.

Importing this package imports every module in it, so a new loss is one new module here that
decorates its function with `register_policy_loss` (plus its name in config/algo.py's
POLICY_LOSSES, which the config validates against).
"""

import importlib
import pkgutil

# Discovered, not listed: a loss module registers itself by being in this package.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
