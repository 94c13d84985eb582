"""The trainer's side: client, dataset, read-ahead, same-host reader, batch slots, directory client, DataModule.

Imports only the leaves and actdata.shm: a training machine needs neither the server stack nor a model."""
