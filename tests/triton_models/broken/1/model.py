"""Fails to load, with a message the launcher's error must carry."""


class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken-model-sentinel: this model refuses to load")

    def execute(self, requests):
        raise AssertionError("never loaded")
