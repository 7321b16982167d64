"""The node's hardware: buses and device models. Devices know nothing of OS
instances or the microvisor; each answers ``read``/``write`` at an offset."""
