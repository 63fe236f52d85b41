from lmserve.kernel_cache import main

main()
