from services.bench.run import main

main()
