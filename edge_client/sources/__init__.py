"""Where a device's samples come from: a watched folder, a camera, or a fleet partition.

`folder` and `camera` are `SampleSource`s feeding the device's sample store and its served
model (`edge_client.feed`); `partition` deals out the simulation's share of a fleet data set.
The learner sees none of them: it reads ids through a `DeviceStream` and a `SampleTable`.
"""
