"""FedFMX core, one sub-package per part; services (`edge_client`, `aggregator`, `export`)
build on it, never the other way round, and it imports no MQTT and no CLI code.

- `learner`: the SGD mixture-of-experts learner (model, FRES, AES/RAR, local loop, methods);
- `closed_form`: the exact closed-form head from summed feature statistics (default method);
- `trunk`: the frozen pretrained trunk, its taps and its feature cache;
- `device`: a device's round, free of any transport;
- `federation`: the aggregator's round logic and merges, and the in-process engine;
- `wire`: what travels (codecs, messages, signatures, deltas, district partials);
- `data`: data sets, the class-incremental protocol, preprocessing;
- `evaluation`: the benchmark grid, metrics and plots;
- top level: configuration, device profiles, errors, storage and Python 3.10 compatibility.
"""

__version__ = "0.1.0"
