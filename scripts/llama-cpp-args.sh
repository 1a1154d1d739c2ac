# sourced by llama-cpp-peer.sh and llama-cpp-tools.sh
# this CPU's instruction sets as read from /proc/cpuinfo (never assumed: an AMD EPYC here has AVX2 and no AVX-512,
# a Xeon has AVX-512 and AMX); AMX stays off, since llama.cpp's AMX build crashes on our machines
native_args() {
  local flags on
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  on() { case $flags in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
  echo "-DGGML_NATIVE=OFF -DGGML_SSE42=$(on sse4_2) -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_BMI2=$(on bmi2) \
-DGGML_FMA=$(on fma) -DGGML_F16C=$(on f16c) -DGGML_AVX_VNNI=$(on avx_vnni) -DGGML_AVX512=$(on avx512f) \
-DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni) -DGGML_AVX512_BF16=$(on avx512_bf16) \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}
