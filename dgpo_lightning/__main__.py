from dgpo_lightning.cli import main

main()
