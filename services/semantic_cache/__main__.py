from services.semantic_cache.app import main

main()
