from services.model.app import main

main()
