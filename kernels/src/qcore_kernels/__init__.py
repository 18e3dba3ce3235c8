"""qcore-kernels: CuPy RawKernel providers for qcore, chosen at run time.

CuPy is imported lazily (only when a provider runs on a CUDA tensor); importing this
package loads neither CuPy nor the CUDA driver.
"""

__version__ = "0.1.0"
