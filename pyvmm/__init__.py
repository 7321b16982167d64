"""pyvmm: a devirtualizable virtual machine monitor on Linux KVM.

Importing the package is cheap on purpose: ``pyvmm boot`` counts Python start-up
against QEMU's, so submodules are imported by whoever needs them.
"""

__version__ = "0.1.0"
