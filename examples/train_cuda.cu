// examples/train_cuda.cu - examples/train.cpp built by nvcc with the CUDA backend (--device cuda): the same program.
#define EARN_TRAIN_CUDA 1
#include "train.cpp"
