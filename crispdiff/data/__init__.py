"""Images in: folders and datasets decoded once into a cache, batches augmented on the device, auto classes."""
