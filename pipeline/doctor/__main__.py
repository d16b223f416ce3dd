from pipeline.doctor.cli import main

main()
