from services.tools.engine.cli import main

main()
