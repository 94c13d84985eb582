"""actdata: a language model and a text corpus turned into an endless stream of activation vectors.

text -> token blocks -> model + hooks -> shared buffer -> HTTP routes -> wire -> DataLoader.
"""
__version__ = "0.1.0"


def __getattr__(name):  # light imports: the client side need not load the server stack
    if name in ("ActivationClient",):
        from .reading.client import ActivationClient

        return ActivationClient
    if name in ("RemoteActivationDataset", "ActivationDataModule"):
        from .reading import dataset

        return getattr(dataset, name)
    raise AttributeError(name)
