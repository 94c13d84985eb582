"""actdata: a language model and a text corpus turned into an endless stream of activation vectors.

text -> token blocks -> model + hooks -> shared buffer -> HTTP routes -> wire -> DataLoader.

The trainer's public surface is below (`from actdata import RemoteActivationDataset`). Each name is
imported on first use, so `import actdata` loads neither torch nor the server stack, and
`ActivationDataModule` alone imports Lightning.
"""
__version__ = "0.1.0"

__all__ = ["RemoteActivationDataset", "ActivationClient", "ProvenanceBatch", "ServerLimits",
           "ActivationServerError", "ServerUnavailable", "NotADirectory", "PointsError", "ActivationDataModule"]


def __getattr__(name):  # plain import statements, so that the layering test sees every edge
    if name == "RemoteActivationDataset":
        from .reading.dataset import RemoteActivationDataset as value
    elif name in ("ActivationClient", "ServerLimits"):
        from .reading import client as module

        value = getattr(module, name)
    elif name == "ProvenanceBatch":
        from .reading.tensor_reader import ProvenanceBatch as value
    elif name in ("ActivationServerError", "ServerUnavailable"):
        from .reading import failures as module

        value = getattr(module, name)
    elif name == "NotADirectory":
        from .reading.directory import NotADirectory as value
    elif name == "PointsError":
        from .points import PointsError as value
    elif name == "ActivationDataModule":
        from .reading.datamodule import ActivationDataModule as value
    else:
        raise AttributeError(f"module 'actdata' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted([*globals(), *__all__])
