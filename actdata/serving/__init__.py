"""Serving: the entry point, the LitServe app and its routes, HTTP limits, metrics, supervision."""
