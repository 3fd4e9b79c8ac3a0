// Python bindings of misa_kernels._C. One module; the CUDA functions exist only in CUDA builds.
#include "ops.h"

#ifndef MISA_CPU_CAPABILITY
#define MISA_CPU_CAPABILITY "DEFAULT"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "misa-kernels compiled kernels (see misa_kernels.backends.cpu / .cuda)";
  m.def("cpu_capability", [] { return std::string(MISA_CPU_CAPABILITY); },
        "the x86 vector capability the CPU kernels were compiled for");
#ifdef MISA_WITH_CUDA
  m.def("has_cuda", [] { return true; });
#else
  m.def("has_cuda", [] { return false; });
#endif
  m.def("cpu_grad_sq_norms", &misa::cpu::grad_sq_norms);
  m.def("cpu_adamw_step_", &misa::cpu::adamw_step_);
#ifdef MISA_WITH_CUDA
  m.def("cuda_grad_sq_norms", &misa::cuda::grad_sq_norms);
  m.def("cuda_adamw_step_", &misa::cuda::adamw_step_);
#endif
}
