"""The benchmarks' timer: the library's alternating side-by-side timer
(:mod:`jaxopt_dnn.timing`, which the app's comparison table uses too)."""

from jaxopt_dnn.timing import alternate, alternate_samples, machine  # noqa: F401
