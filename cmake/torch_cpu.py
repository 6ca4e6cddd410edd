"""Print, as CMake set() commands, what fastdl._C's CPU-only build needs of the torch that
this Python imports: its headers, its library folder, its C++ ABI and its version.

CMakeLists.txt reads this instead of find_package(Torch) when it builds no CUDA:
torch's CMake config, for a CUDA build of torch, stops unless it finds the CUDA toolkit
(headers and libraries), which a machine may lack (a pip-installed torch on a machine
with only the GPU driver) or hold only in part. torch.utils.cpp_extension builds CPU
extensions from the same four facts.
"""
import os

import torch
from torch.utils import cpp_extension


def cmake_list(items):
    return ";".join(str(item).replace("\\", "/") for item in items)


print(f'set(FASTDL_TORCH_INCLUDE_DIRS "{cmake_list(cpp_extension.include_paths())}")')
print(f'set(FASTDL_TORCH_LIBRARY_DIR "{cmake_list([os.path.join(os.path.dirname(torch.__file__), "lib")])}")')
print(f"set(FASTDL_TORCH_CXX11_ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})")
print(f'set(Torch_VERSION "{torch.__version__.split("+")[0]}")')
