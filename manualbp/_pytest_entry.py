"""The ``pytest11`` entry point ``manualbp``: loads :mod:`manualbp.pytest_plugin` under its module name.

pytest registers an entry point's module under the entry point's name. Were the entry point the plugin
itself, the plugin would be registered as "manualbp", and ``-p manualbp.pytest_plugin`` or
``pytest_plugins = ["manualbp.pytest_plugin"]`` in a conftest would register the same module a second time
under its module name: "Plugin already registered under a different name". This module is what is registered
as "manualbp" (so ``-p manualbp`` and ``-p no:manualbp`` keep working); pytest loads the plugin through the
``pytest_plugins`` below, as "manualbp.pytest_plugin", the name every other way of asking for it uses.
"""

pytest_plugins = ["manualbp.pytest_plugin"]
