from services.tools.bench.gateway.run import main

main()
