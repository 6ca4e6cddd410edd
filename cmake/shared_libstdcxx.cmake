# fastdl_link_shared_libstdcxx(<target>): link <target> against the shared libstdc++, named.
#
# g++ links its runtime with -lstdc++, and the linker takes libstdc++.a from the first
# directory that holds either libstdc++.so or libstdc++.a. A g++ wrapper whose -B directory
# holds the archive alone (the H200 machine's /opt/gcc/bin/g++, GCC 13.3) so puts a private
# copy of libstdc++ into fastdl._C, beside the shared one (GCC 14's) that torch has loaded.
# There, formatting a number into an error message (TORCH_CHECK's ostream) reached another
# version's locale facet and segfaulted: every fastdl._C op that raised killed the process
# (cuda-gdb: std::ostream::_M_insert<long> inside _C.so, called from fastdl::check_rows).
# Naming the shared library before the driver's own -lstdc++ resolves every libstdc++
# symbol there, so nothing is taken from the archive; with an ordinary g++ it is the library
# the driver would have linked anyway.
function(fastdl_link_shared_libstdcxx target)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU" OR NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    return()
  endif()
  # libstdc++.so: the compiler's own (matches its headers); libstdc++.so.6: the runtime
  foreach(name libstdc++.so libstdc++.so.6)
    execute_process(COMMAND "${CMAKE_CXX_COMPILER}" "-print-file-name=${name}"
                    OUTPUT_VARIABLE path OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
    if(rc EQUAL 0 AND IS_ABSOLUTE "${path}" AND EXISTS "${path}")
      get_filename_component(path "${path}" REALPATH)
      message(STATUS "fastdl: libstdc++ linked shared: ${path}")
      target_link_libraries(${target} PRIVATE "${path}")
      return()
    endif()
  endforeach()
  # a compiler that finds neither: the runtime where the system keeps it
  find_library(FASTDL_SHARED_LIBSTDCXX NAMES libstdc++.so.6)
  if(FASTDL_SHARED_LIBSTDCXX)
    message(STATUS "fastdl: libstdc++ linked shared: ${FASTDL_SHARED_LIBSTDCXX} (found by CMake)")
    target_link_libraries(${target} PRIVATE "${FASTDL_SHARED_LIBSTDCXX}")
    return()
  endif()
  message(WARNING "fastdl: no shared libstdc++ found; if ${CMAKE_CXX_COMPILER} links the archive, "
                  "${target} carries its own copy beside torch's")
endfunction()
