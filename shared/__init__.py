"""The companion's own helpers: device, scale, data, export, plots."""
