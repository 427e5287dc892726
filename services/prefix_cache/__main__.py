from services.prefix_cache.app import main

main()
