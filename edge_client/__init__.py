"""The device service `fedfmx-edge join`: one edge device's side of the fleet, over MQTT."""
