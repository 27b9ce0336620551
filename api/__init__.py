"""The stateless HTTP front: routes, streaming, errors. It never imports torch."""
