"""qcore's built-in components, registered through the ``qcore`` entry point like any
other plugin: the ``minmax`` and ``hessian`` observers, the ``rtn`` quantizer, the ``int``
and ``vq`` packers and the ``torch`` and ``torch-lut`` kernel providers."""
