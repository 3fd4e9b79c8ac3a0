// Python bindings of the CPU kernels: the module misa_kernels._cpu_<capability>.
//
// The CPU kernels live in their own extension, compiled for the build machine's vector width
// (-mavx512f ... for AVX512), while misa_kernels._C (CUDA kernels) is compiled without those
// flags. The capability is in the module's name, so Python can tell whether this CPU can run
// the module before importing it: importing code built for AVX-512 on a CPU without it would
// die with an illegal instruction instead of falling back to the 'torch' backend.
#include "cpu/multi_tensor.h"
#include "ops.h"

#ifndef MISA_CPU_CAPABILITY
#error "setup.py defines MISA_CPU_CAPABILITY for the CPU kernels"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "misa-kernels vectorised CPU kernels (see misa_kernels.backends.cpu)";
  m.def("cpu_capability", [] { return std::string(MISA_CPU_CAPABILITY); },
        "the x86 vector capability these kernels were compiled for");
  m.attr("chunk_elements") = misa::cpu::kChunkElements;
  m.def("cpu_grad_sq_norms", &misa::cpu::grad_sq_norms);
  m.def("cpu_adamw_step_", &misa::cpu::adamw_step_);
}
