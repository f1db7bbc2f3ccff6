"""build-engines: export the graphs (export/), validate them against the torch reference through the runtimes
(runtimes/), compile TensorRT plans (export/tensorrt_build.py) and write the engine directory's manifest.

It sits above both export/ and runtimes/, which never import each other (their contract is graphs/)."""
