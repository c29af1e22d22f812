"""The SGD FedFMX learner: mixture-of-experts network, FRES, AES/RAR, local loop, methods."""
