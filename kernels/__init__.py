"""mmfm.kernels"""
