"""qcore's built-in components, registered through the ``qcore`` entry point like any
other plugin: the ``minmax`` observer, the ``rtn`` quantizer, the ``int`` packer and the
``torch`` kernel provider."""
