"""mmfm.ps3"""
