import ArgumentParser

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Boot a guest and exit with it.")
    func run() throws {}
}
