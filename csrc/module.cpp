// The Python module pycosdist._C: build information only. The ops themselves are
// registered with the PyTorch dispatcher (see ops.cpp) when this library is loaded.
#include <pybind11/pybind11.h>

#include <thread>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycosdist native extension (ops live under torch.ops.pycosdist)";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = PYCOSDIST_TORCH_VERSION;
#ifdef PYCOSDIST_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_version"] = PYCOSDIST_CUDA_VERSION;
#else
    info["with_cuda"] = false;
    info["cuda_version"] = py::none();
#endif
    info["simd"] = PYCOSDIST_SIMD;
    info["cpu_arch"] = PYCOSDIST_CPU_ARCH;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  }, "How this extension was built: torch version, CUDA, SIMD level.");
}
