"""The graph layer: marker ops, functional-collective emission, node tags,
graph printing and verification. Imports only :mod:`zerograph.runtime`,
:mod:`zerograph.config` and the private-API shim."""
